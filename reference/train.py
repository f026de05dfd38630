#!/usr/bin/env python3
"""Reproduce hobbit_mlx's bundled reference model from scratch.

Pipeline (each stage seeded / deterministic):

1. corpus     -- every ``*.py`` file of a CPython standard library (sorted by
                 relative path), split into train / dev / val by a hash rule on
                 the relative path (see ``split_of``), written to ``--corpus-dir``
                 as uint16 token streams together with the tokenizer.
2. tokenizer  -- byte-level BPE (``tokenizers``) trained on the train split,
                 saved with transformers' ``PreTrainedTokenizerFast``.
3. train      -- transformers' ``Qwen3MoeForCausalLM`` (fused experts, grouped_mm
                 experts implementation) with the auxiliary load-balancing loss,
                 AdamW, warmup + cosine, bf16 autocast on CUDA.  The weights with
                 the best dev loss are written to ``--out`` (bf16 safetensors
                 shards, each < 15 MiB) together with ``metrics.json``.
4. export     -- per-expert hub-style keys + a hub-style config.json written by
                 hand, verified against mlx-lm (unquantized logits must match
                 the torch model), then quantized to 4 bits (group 64) with
                 ``mlx_lm.convert`` into ``--export-dir``.

Typical use::

    # CPU smoke test (also what the GPU run does, with --device cuda)
    python reference/train.py --device cpu --steps 5 --corpus-dir .corpus --out .work/smoke \
        --export-dir .work/smoke_export
    # the real run (training only; mlx is not installed on the GPU machine)
    python reference/train.py --device cuda --minutes 7 --corpus-dir .corpus --out $OUT --no-export
    # export a finished training run
    python reference/train.py --export-only .work/gpu_run --corpus-dir .corpus

Stage 1+2 need a CPython stdlib (``--stdlib-dir``, default: this interpreter's);
when ``--corpus-dir`` already holds a packed corpus (``meta.json``) it is reused,
so a machine with another Python version trains on exactly the same tokens.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
DEFAULT_EXPORT_DIR = REPO / "hobbit_mlx" / "reference_model"

SEED = 1234
VOCAB_SIZE = 4096
BOS, EOS, IM_START, IM_END = "<|startoftext|>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = [BOS, EOS, IM_START, IM_END]  # ids 0..3
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# The model.  Qwen3-MoE layout (what Qwen3-30B-A3B uses), scaled down:
# 8 layers x 64 fine-grained experts (top-8, intermediate 64), hidden 320.
MODEL_CONFIG = dict(
    vocab_size=VOCAB_SIZE,
    hidden_size=320,
    intermediate_size=1024,  # dense-MLP size; unused (every layer is MoE)
    num_hidden_layers=8,
    num_attention_heads=8,
    num_key_value_heads=2,
    head_dim=40,
    hidden_act="silu",
    max_position_embeddings=2048,
    initializer_range=0.02,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
    rope_theta=10000.0,
    attention_bias=False,
    decoder_sparse_step=1,
    mlp_only_layers=[],
    moe_intermediate_size=64,
    num_experts=64,
    num_experts_per_tok=8,
    norm_topk_prob=True,
    router_aux_loss_coef=0.01,
    bos_token_id=0,
    eos_token_id=1,
    pad_token_id=1,
)


def log(*a):
    print(*a, flush=True)


# --------------------------------------------------------------------------- corpus
def default_stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def list_stdlib_files(stdlib: Path) -> list[str]:
    """All *.py files of the stdlib, relative posix paths, sorted.

    Excluded: site-packages/ (not the stdlib), __pycache__/, and the two
    machine-specific build-configuration files (_sysconfigdata_*.py and
    config-3.*/ ), whose content differs between builds of the same Python.
    """
    out = []
    for root, dirs, files in os.walk(stdlib):
        rel_root = Path(root).relative_to(stdlib)
        parts = rel_root.parts
        if parts and (parts[0] in ("site-packages", "dist-packages") or parts[0].startswith("config-")):
            dirs[:] = []
            continue
        dirs[:] = [d for d in dirs if d != "__pycache__"]
        for f in files:
            if f.endswith(".py") and not f.startswith("_sysconfigdata_"):
                out.append((rel_root / f).as_posix())
    return sorted(out)


def split_of(rel_path: str) -> str:
    """Deterministic split rule on the relative path.

    h = int(sha1(rel_path utf-8).hexdigest(), 16) % 20
    h == 0 -> "val" (held out, reported), h == 1 -> "dev" (checkpoint selection),
    else "train".
    """
    h = int(hashlib.sha1(rel_path.encode("utf-8")).hexdigest(), 16) % 20
    return "val" if h == 0 else ("dev" if h == 1 else "train")


def read_text(path: Path) -> str:
    return path.read_bytes().decode("utf-8", errors="replace")


def train_tokenizer(texts):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    # encode() adds <|startoftext|> in front, like every training document starts.
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, 0)]
    )
    assert tok.token_to_id(BOS) == 0 and tok.token_to_id(EOS) == 1
    return tok


def save_tokenizer(tok, out_dir: Path):
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=EOS,
        additional_special_tokens=[IM_START, IM_END],
        model_max_length=MODEL_CONFIG["max_position_embeddings"],
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(out_dir))


def build_corpus(stdlib: Path, corpus_dir: Path):
    t0 = time.time()
    files = list_stdlib_files(stdlib)
    splits = {"train": [], "dev": [], "val": []}
    for f in files:
        splits[split_of(f)].append(f)
    log(f"[corpus] {stdlib}: {len(files)} files -> " + ", ".join(f"{k} {len(v)}" for k, v in splits.items()))
    texts = {k: [read_text(stdlib / f) for f in v] for k, v in splits.items()}

    tok = train_tokenizer(texts["train"])
    corpus_dir.mkdir(parents=True, exist_ok=True)
    tok_dir = corpus_dir / "tokenizer"
    if tok_dir.exists():
        shutil.rmtree(tok_dir)
    save_tokenizer(tok, tok_dir)
    log(f"[corpus] tokenizer trained ({tok.get_vocab_size()} tokens) in {time.time() - t0:.1f}s")

    meta = {
        "python": sys.version.split()[0],
        "stdlib_dir": str(stdlib),
        "split_rule": "h = int(sha1(relpath).hexdigest(), 16) % 20; 0 -> val, 1 -> dev, else train",
        "seed": SEED,
        "vocab_size": VOCAB_SIZE,
        "splits": {},
    }
    for name, paths in splits.items():
        encs = tok.encode_batch(texts[name], add_special_tokens=False)
        ids, offsets = [], []
        pos = 0
        for e in encs:
            doc = [0] + e.ids + [1]
            offsets.append(pos)
            pos += len(doc)
            ids.extend(doc)
        arr = np.asarray(ids, dtype=np.uint16)
        arr.tofile(corpus_dir / f"{name}.bin")
        (corpus_dir / f"{name}_files.txt").write_text("".join(p + "\n" for p in paths))
        (corpus_dir / f"{name}_offsets.json").write_text(json.dumps(offsets))
        nbytes = sum(len(t.encode("utf-8")) for t in texts[name])
        meta["splits"][name] = {"files": len(paths), "tokens": int(arr.size), "bytes": nbytes}
        log(f"[corpus] {name}: {len(paths)} files, {nbytes / 1e6:.2f} MB, {arr.size / 1e6:.2f} M tokens")
    (corpus_dir / "meta.json").write_text(json.dumps(meta, indent=1))
    log(f"[corpus] done in {time.time() - t0:.1f}s -> {corpus_dir}")
    return meta


def load_split(corpus_dir: Path, name: str) -> np.ndarray:
    return np.fromfile(corpus_dir / f"{name}.bin", dtype=np.uint16)


# --------------------------------------------------------------------------- model
def hf_config(**overrides):
    from transformers import Qwen3MoeConfig

    kw = dict(MODEL_CONFIG)
    kw.update(overrides)
    rope_theta = kw.pop("rope_theta")
    cfg = Qwen3MoeConfig(**kw, rope_parameters={"rope_type": "default", "rope_theta": rope_theta})
    cfg.output_router_logits = True
    cfg.router_aux_loss_coef = MODEL_CONFIG["router_aux_loss_coef"]
    return cfg


def build_model(device: str):
    import torch
    from transformers import Qwen3MoeForCausalLM

    torch.manual_seed(SEED)
    cfg = hf_config()
    try:
        cfg._attn_implementation = "sdpa"
    except Exception:
        pass
    model = Qwen3MoeForCausalLM(cfg).to(device)
    return model


def _register_bf16_grouped_mm():
    """Register 'grouped_mm_bf16': transformers' grouped_mm experts forward, with the
    fused expert weights cast to bf16 (differentiably) so that the grouped GEMMs run in
    bf16 under autocast while the master weights stay fp32.  (transformers casts the
    *input* to the weight dtype, so plain grouped_mm with fp32 weights runs in fp32.)"""
    import torch
    from transformers.integrations import moe as tmoe

    class _Cast:
        def __init__(self, mod):
            object.__setattr__(self, "_mod", mod)

        def __getattr__(self, name):
            v = getattr(self._mod, name)
            if name in ("gate_up_proj", "down_proj", "up_proj") and isinstance(v, torch.Tensor):
                return v.to(torch.bfloat16)
            return v

    def grouped_mm_bf16(self, hidden_states, top_k_index, top_k_weights):
        out = tmoe.grouped_mm_experts_forward(
            _Cast(self), hidden_states.to(torch.bfloat16), top_k_index, top_k_weights.to(torch.bfloat16)
        )
        return out

    tmoe.ALL_EXPERTS_FUNCTIONS.register("grouped_mm_bf16", grouped_mm_bf16)


def set_experts_impl(model, name: str):
    if hasattr(model, "set_experts_implementation"):
        try:
            model.set_experts_implementation(name)
        except Exception:
            model.config._experts_implementation = name
    else:
        model.config._experts_implementation = name
    # every sub-module shares model.config, but be explicit
    for m in model.modules():
        c = getattr(m, "config", None)
        if c is not None and c is not model.config and hasattr(c, "_experts_implementation"):
            c._experts_implementation = name


def get_experts_impl(model) -> str:
    return getattr(model.config, "_experts_implementation", None)


# --------------------------------------------------------------------------- training
def train(args) -> dict:
    import torch

    t_start = time.time()
    device = args.device
    corpus_dir = Path(args.corpus_dir)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(SEED)
    np.random.seed(SEED)
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        log(f"[train] cuda device: {torch.cuda.get_device_name(0)}")
    else:
        torch.set_num_threads(max(1, os.cpu_count() or 1))

    import transformers

    log(f"[train] torch {torch.__version__}, transformers {transformers.__version__}, python {sys.version.split()[0]}")
    train_ids = torch.from_numpy(load_split(corpus_dir, "train").astype(np.int64)).to(device)
    dev_ids = torch.from_numpy(load_split(corpus_dir, "dev").astype(np.int64)).to(device)
    n_train = train_ids.numel()
    log(f"[train] train tokens {n_train:,}, dev tokens {dev_ids.numel():,}")

    model = build_model(device)
    n_params = sum(p.numel() for p in model.parameters())
    cfg = model.config
    n_expert = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    per_expert = n_expert // (cfg.num_hidden_layers * cfg.num_experts)
    n_active = n_params - n_expert + cfg.num_hidden_layers * cfg.num_experts_per_tok * per_expert
    n_active -= cfg.vocab_size * cfg.hidden_size  # the embedding is a lookup
    log(f"[train] params total {n_params:,}, experts {n_expert:,}, active/token (w/o embedding) {n_active:,}")

    T, B = args.seq_len, args.batch_size
    gen = torch.Generator(device=device)
    gen.manual_seed(SEED)

    def get_batch():
        starts = torch.randint(0, n_train - T - 1, (B,), generator=gen, device=device)
        idx = starts[:, None] + torch.arange(T + 1, device=device)[None, :]
        return train_ids[idx]

    # fixed dev batches, evenly spread over the dev stream
    n_dev_seq = min(args.dev_seqs, max(1, (dev_ids.numel() - 1) // (T + 1)))
    dev_starts = torch.linspace(0, dev_ids.numel() - T - 2, n_dev_seq).long().to(device)
    dev_batch = dev_ids[dev_starts[:, None] + torch.arange(T + 1, device=device)[None, :]]

    if device == "cuda":
        amp = lambda: torch.autocast("cuda", dtype=torch.bfloat16)  # noqa: E731
    else:  # --amp-cpu exercises the bf16 path of the GPU run on the CPU (for smoke tests)
        amp = lambda: torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.amp_cpu)  # noqa: E731

    def fwd(batch, with_aux=True):
        x = batch[:, :-1]
        y = batch[:, 1:]
        with amp():
            out_ = model(input_ids=x, output_router_logits=with_aux, use_cache=False)
            logits = out_.logits.float()
        lm = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1))
        aux = out_.aux_loss if with_aux else None
        return lm, aux

    @torch.no_grad()
    def dev_loss():
        model.eval()
        tot = 0.0
        for i in range(0, dev_batch.size(0), B):
            lm, _ = fwd(dev_batch[i : i + B], with_aux=False)
            tot += lm.item() * dev_batch[i : i + B].size(0)
        model.train()
        return tot / dev_batch.size(0)

    # ---- choose the experts implementation (fastest one that works here)
    _register_bf16_grouped_mm()
    if device == "cuda" or args.amp_cpu:
        candidates = ["grouped_mm_bf16", "grouped_mm"]
    else:
        candidates = ["grouped_mm"]
    if args.experts_impl:
        candidates = [args.experts_impl]
    timings = {}
    model.train()
    for name in candidates:
        try:
            set_experts_impl(model, name)
            ts = []
            for _ in range(3):
                if device == "cuda":
                    torch.cuda.synchronize()
                t0 = time.time()
                lm, aux = fwd(get_batch())
                (lm + cfg.router_aux_loss_coef * aux).backward()
                if device == "cuda":
                    torch.cuda.synchronize()
                ts.append(time.time() - t0)
                if not math.isfinite(lm.item()):
                    raise RuntimeError(f"non-finite loss {lm.item()}")
            model.zero_grad(set_to_none=True)
            timings[name] = min(ts[1:]) if len(ts) > 1 else ts[0]
            log(f"[train] experts impl {name!r}: fwd+bwd {timings[name] * 1000:.0f} ms/step (B={B}, T={T})")
        except Exception as e:  # pragma: no cover - device specific
            model.zero_grad(set_to_none=True)
            log(f"[train] experts impl {name!r} failed: {type(e).__name__}: {str(e)[:300]}")
            if device == "cuda":
                torch.cuda.empty_cache()
    if not timings:
        log("[train] falling back to the 'eager' experts implementation")
        set_experts_impl(model, "eager")
        chosen = "eager"
    else:
        chosen = min(timings, key=timings.get)
        set_experts_impl(model, chosen)
    log(f"[train] using experts implementation {chosen!r} (config: {get_experts_impl(model)!r})")
    # reset the RNG so the training batches don't depend on how many candidates were timed
    gen.manual_seed(SEED)

    decay, no_decay = [], []
    for n, p in model.named_parameters():
        (decay if p.dim() >= 2 else no_decay).append(p)

    def make_opt():
        groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        kw = dict(lr=args.lr, betas=(0.9, 0.95), eps=1e-8)
        if device == "cuda":
            try:
                return torch.optim.AdamW(groups, fused=True, **kw)
            except Exception as e:  # pragma: no cover
                log(f"[train] fused AdamW unavailable ({e}); using the default")
        return torch.optim.AdamW(groups, **kw)

    opt = make_opt()

    budget_s = args.minutes * 60 if args.minutes else None
    if args.max_wall:
        left = args.max_wall - (time.time() - t_start) - args.save_reserve
        budget_s = left if budget_s is None else min(budget_s, left)
    max_steps = args.steps
    if budget_s is None and max_steps is None:
        raise SystemExit("give --steps and/or --minutes")
    log(f"[train] budget: steps={max_steps}, seconds={None if budget_s is None else round(budget_s)}")

    def progress(step, elapsed):
        p = 0.0
        if max_steps:
            p = max(p, step / max_steps)
        if budget_s:
            p = max(p, elapsed / budget_s)
        return min(p, 1.0)

    # Schedule: linear warmup -> constant peak ("stable") -> linear decay to min_lr, then stop
    # (warmup-stable-decay).  The decay starts when the dev loss has not improved for
    # `patience` evaluations (the corpus is small, so many epochs fit in the budget and the
    # model would start to overfit), or at the latest at `decay_start` of the budget.  It
    # lasts `decay_frac` of the progress made so far (at least 5% of the budget).
    history = []
    best = {"dev_loss": float("inf"), "step": -1}
    best_state = None
    peak_lr = args.lr
    decay_from = None  # (progress at decay start, progress at end)
    stale = 0

    def snapshot(step, elapsed, tokens, tag="eval"):
        nonlocal best_state, stale
        dl = dev_loss()
        rec = {"step": step, "tokens": tokens, "elapsed_s": round(elapsed, 1), "dev_loss": round(dl, 4), "tag": tag}
        if dl < best["dev_loss"] * (1 - args.min_improve):
            stale = 0
        else:
            stale += 1
        if dl < best["dev_loss"]:
            best.update(dev_loss=dl, step=step, tokens=tokens)
            best_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        return rec

    step, tokens = 0, 0
    t_train = time.time()
    last_eval = t_train
    last_eval_step = -1
    last_eval_tokens = 0
    lm_acc, aux_acc, acc_n = 0.0, 0.0, 0
    t_log = time.time()
    tok_log = 0
    while True:
        elapsed = time.time() - t_train
        p = progress(step, elapsed)
        if p >= 1.0 or (decay_from is not None and p >= decay_from[1]):
            break
        if decay_from is None and step >= args.warmup and (p >= args.decay_start or stale >= args.patience):
            decay_from = (p, min(1.0, p + max(args.decay_frac * p, 0.05)))
            log(f"[train] step {step}: start of LR decay at progress {p:.3f} "
                f"({'dev plateau' if stale >= args.patience else 'budget'}), ends at {decay_from[1]:.3f}")
        if step < args.warmup:
            lr = peak_lr * (step + 1) / args.warmup
        elif decay_from is None:
            lr = peak_lr
        else:
            q = (p - decay_from[0]) / max(decay_from[1] - decay_from[0], 1e-9)
            lr = peak_lr + (args.min_lr - peak_lr) * min(max(q, 0.0), 1.0)
        for g in opt.param_groups:
            g["lr"] = lr
        lm, aux = fwd(get_batch())
        loss = lm + cfg.router_aux_loss_coef * aux
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        opt.step()
        step += 1
        tokens += B * T
        tok_log += B * T
        lm_acc += lm.detach()
        aux_acc += aux.detach()
        acc_n += 1
        if step % args.log_every == 0 or step == 1:
            lm_v, aux_v = float(lm_acc / acc_n), float(aux_acc / acc_n)
            now = time.time()
            rec = {
                "step": step,
                "tokens": tokens,
                "elapsed_s": round(now - t_train, 1),
                "lr": round(lr, 6),
                "train_lm_loss": round(lm_v, 4),
                "aux_loss": round(aux_v, 4),
                "tok_per_s": round(tok_log / max(now - t_log, 1e-9)),
            }
            log("[train] " + json.dumps(rec))
            history.append(rec)
            lm_acc, aux_acc, acc_n = 0.0, 0.0, 0
            t_log, tok_log = now, 0
            if not (math.isfinite(lm_v) and math.isfinite(aux_v)):
                if best_state is None:
                    raise SystemExit("loss diverged before the first checkpoint")
                peak_lr *= 0.5
                log(f"[train] non-finite loss: restoring the best weights (step {best['step']}), peak lr -> {peak_lr}")
                model.load_state_dict({k: v.to(device) for k, v in best_state.items()})
                opt = make_opt()
                history.append({"step": step, "event": "diverged; restored best, halved lr"})
                continue
        if time.time() - last_eval >= args.eval_every_s or tokens - last_eval_tokens >= args.eval_every_epochs * n_train:
            rec = snapshot(step, time.time() - t_train, tokens)
            log("[eval] " + json.dumps(rec))
            history.append(rec)
            last_eval = time.time()
            last_eval_step = step
            last_eval_tokens = tokens
    train_s = time.time() - t_train
    if last_eval_step != step:
        rec = snapshot(step, train_s, tokens, tag="final")
        log("[eval] " + json.dumps(rec))
        history.append(rec)
    log(f"[train] done: {step} steps, {tokens:,} tokens in {train_s:.1f}s ({tokens / max(train_s, 1e-9):,.0f} tok/s); "
        f"best dev loss {best['dev_loss']:.4f} at step {best['step']}")

    # ---- save the best weights as bf16 shards (< 15 MiB each)
    state = best_state
    save_shards(state, out, max_bytes=args.shard_mib * 2**20)
    summary = {
        "device": device,
        "device_name": torch.cuda.get_device_name(0) if device == "cuda" else "cpu",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": sys.version.split()[0],
        "experts_implementation": chosen,
        "experts_impl_timings_s": timings,
        "seq_len": T,
        "batch_size": B,
        "lr": args.lr,
        "final_peak_lr": peak_lr,
        "min_lr": args.min_lr,
        "decay": decay_from,
        "schedule": "warmup-stable-decay; decay starts on dev plateau or at decay_start",
        "warmup": args.warmup,
        "weight_decay": args.weight_decay,
        "router_aux_loss_coef": cfg.router_aux_loss_coef,
        "steps": step,
        "tokens": tokens,
        "train_tokens_in_corpus": n_train,
        "epochs": tokens / n_train,
        "train_seconds": round(train_s, 1),
        "total_seconds": round(time.time() - t_start, 1),
        "best_dev_loss": best["dev_loss"],
        "best_step": best["step"],
        "best_tokens": best.get("tokens"),
        "params_total": n_params,
        "params_active_per_token_wo_embedding": n_active,
        "model_config": MODEL_CONFIG,
        "history": history,
        "argv": sys.argv,
    }
    (out / "metrics.json").write_text(json.dumps(summary, indent=1))
    log(f"[train] wrote {out} in {time.time() - t_start:.1f}s total")
    return summary


def save_shards(state: dict, out: Path, max_bytes: int):
    import torch
    from safetensors.torch import save_file

    for f in out.glob("model-*.safetensors"):
        f.unlink()
    # first-fit decreasing, so that as few files as possible come back from the GPU machine
    items = sorted(((k, state[k].to(torch.bfloat16).contiguous()) for k in state), key=lambda kv: -kv[1].numel())
    shards, sizes = [], []
    for k, v in items:
        nb = v.numel() * 2
        for i in range(len(shards)):
            if sizes[i] + nb <= max_bytes:
                shards[i][k] = v
                sizes[i] += nb
                break
        else:
            shards.append({k: v})
            sizes.append(nb)
    for i, sh in enumerate(shards):
        save_file(sh, str(out / f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"), metadata={"format": "pt"})
    log(f"[train] saved {len(shards)} bf16 shard(s)")


def load_torch_state(ckpt_dir: Path) -> dict:
    from safetensors.torch import load_file

    state = {}
    for f in sorted(ckpt_dir.glob("model-*.safetensors")):
        state.update(load_file(str(f)))
    if not state:
        raise SystemExit(f"no model-*.safetensors in {ckpt_dir}")
    return state


def pack_for_transfer(ckpt_dir: Path, dst: Path, max_file_bytes: int = int(15.5 * 2**20)) -> int:
    """Losslessly pack the bf16 shards of ``ckpt_dir`` into ``dst`` for a transfer that
    limits the total size (the GPU machine returns at most 64 MiB): each bf16 tensor's
    high bytes (sign + exponent) and low bytes (exponent bit + mantissa) are zlib-
    compressed separately (the high bytes carry only a few bits of entropy), written
    into ``packed-NNNN.bin`` files of at most ``max_file_bytes`` plus ``packed_index.json``.
    ``unpack_transfer`` restores the exact safetensors shards."""
    import zlib

    import torch

    state = load_torch_state(ckpt_dir)
    dst.mkdir(parents=True, exist_ok=True)
    index, files = [], []
    cur, cur_n = bytearray(), 0

    def flush():
        nonlocal cur
        if cur:
            name = f"packed-{len(files) + 1:04d}.bin"
            (dst / name).write_bytes(bytes(cur))
            files.append(name)
            cur = bytearray()

    for k in sorted(state):
        t = state[k]
        assert t.dtype == torch.bfloat16, (k, t.dtype)
        u16 = t.contiguous().view(torch.int16).numpy().view(np.uint16).reshape(-1)
        hi = zlib.compress((u16 >> 8).astype(np.uint8).tobytes(), 6)
        lo = zlib.compress((u16 & 0xFF).astype(np.uint8).tobytes(), 6)
        if cur and len(cur) + len(hi) + len(lo) > max_file_bytes:
            flush()
        off = len(cur)
        cur += hi + lo
        index.append({"name": k, "shape": list(t.shape), "file": f"packed-{len(files) + 1:04d}.bin",
                      "offset": off, "hi": len(hi), "lo": len(lo)})
    flush()
    (dst / "packed_index.json").write_text(json.dumps(index))
    total = sum((dst / f).stat().st_size for f in files)
    raw = sum(t.numel() * 2 for t in state.values())
    log(f"[pack] {len(state)} tensors, {raw / 1e6:.1f} MB bf16 -> {len(files)} files, {total / 1e6:.1f} MB")
    return total


def unpack_transfer(src: Path, ckpt_dir: Path):
    import zlib

    import torch

    index = json.loads((src / "packed_index.json").read_text())
    blobs = {}
    state = {}
    for e in index:
        if e["file"] not in blobs:
            blobs[e["file"]] = (src / e["file"]).read_bytes()
        b = blobs[e["file"]]
        hi = np.frombuffer(zlib.decompress(b[e["offset"] : e["offset"] + e["hi"]]), dtype=np.uint8)
        lo = np.frombuffer(zlib.decompress(b[e["offset"] + e["hi"] : e["offset"] + e["hi"] + e["lo"]]), dtype=np.uint8)
        u16 = (hi.astype(np.uint16) << 8) | lo.astype(np.uint16)
        state[e["name"]] = torch.from_numpy(u16.view(np.int16).copy()).view(torch.bfloat16).reshape(e["shape"])
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    save_shards(state, ckpt_dir, max_bytes=int(15.5 * 2**20))
    log(f"[pack] unpacked {len(state)} tensors into {ckpt_dir}")


# --------------------------------------------------------------------------- export
def hub_config() -> dict:
    """config.json in the layout mlx-lm's qwen3_moe ModelArgs reads (hub style)."""
    c = dict(MODEL_CONFIG)
    c.pop("router_aux_loss_coef")
    c.update(
        architectures=["Qwen3MoeForCausalLM"],
        model_type="qwen3_moe",
        rope_scaling=None,
        torch_dtype="float32",
        output_router_logits=False,
        router_aux_loss_coef=MODEL_CONFIG["router_aux_loss_coef"],
        use_cache=True,
        use_sliding_window=False,
        sliding_window=None,
        attention_dropout=0.0,
    )
    return c


def hub_state(state: dict, cfg: dict) -> dict:
    """transformers-5 fused experts -> per-expert hub keys (float32 numpy)."""
    import torch

    E, I = cfg["num_experts"], cfg["moe_intermediate_size"]
    out = {}
    for k, v in state.items():
        v = v.to(torch.float32)
        if k.endswith(".mlp.experts.gate_up_proj"):  # [E, 2I, H], gate rows first
            pre = k[: -len("gate_up_proj")]
            assert v.shape[0] == E and v.shape[1] == 2 * I, v.shape
            for e in range(E):
                out[f"{pre}{e}.gate_proj.weight"] = v[e, :I].contiguous().numpy()
                out[f"{pre}{e}.up_proj.weight"] = v[e, I:].contiguous().numpy()
        elif k.endswith(".mlp.experts.down_proj"):  # [E, H, I]
            pre = k[: -len("down_proj")]
            for e in range(E):
                out[f"{pre}{e}.down_proj.weight"] = v[e].contiguous().numpy()
        else:
            out[k] = v.contiguous().numpy()
    return out


def export(ckpt_dir: Path, corpus_dir: Path, export_dir: Path, verify_tol: float = 2e-3) -> dict:
    import torch
    from safetensors.numpy import save_file
    from transformers import Qwen3MoeForCausalLM

    import mlx.core as mx
    from mlx_lm import convert, load

    t0 = time.time()
    state = load_torch_state(ckpt_dir)
    cfg = hub_config()
    tmp = export_dir.parent / (export_dir.name + ".unquantized.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_file(hub_state(state, cfg), str(tmp / "model.safetensors"), metadata={"format": "pt"})
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
    for f in (corpus_dir / "tokenizer").iterdir():
        shutil.copy(f, tmp / f.name)

    # ---- verify: torch (fp32) vs unquantized mlx-lm on the same tokens
    hf = hf_config()
    hf._experts_implementation = "eager"
    torch.manual_seed(0)
    tm = Qwen3MoeForCausalLM(hf)
    missing, unexpected = tm.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
    missing = [m for m in missing if not m.endswith("inv_freq")]
    assert not missing and not unexpected, (missing, unexpected)
    tm.eval()
    val = load_split(corpus_dir, "val")
    rng = np.random.default_rng(SEED)
    starts = rng.integers(0, val.size - 257, size=2)
    toks = np.stack([val[s : s + 256].astype(np.int64) for s in starts])
    with torch.no_grad():
        lt = tm(input_ids=torch.from_numpy(toks), use_cache=False).logits.float().numpy()
    mm, _ = load(str(tmp))
    lm_ = np.array(mm(mx.array(toks.astype(np.int32))).astype(mx.float32))
    diff = float(np.abs(lt - lm_).max())
    scale = float(np.abs(lt).max())
    same_argmax = float((lt.argmax(-1) == lm_.argmax(-1)).mean())
    log(f"[export] torch vs mlx-lm (unquantized): max|dlogit| = {diff:.2e} (max|logit| {scale:.1f}), "
        f"argmax agreement {same_argmax:.4f}")
    if not (diff <= verify_tol * max(1.0, scale) and same_argmax >= 0.999):
        raise SystemExit("export verification FAILED: torch and mlx-lm logits differ")
    del mm

    # ---- quantize with mlx-lm (4-bit, group 64; the router gate 8-bit per qwen3_moe's predicate)
    if export_dir.exists():
        shutil.rmtree(export_dir)
    convert(str(tmp), mlx_path=str(export_dir), quantize=True, q_group_size=64, q_bits=4, dtype="float32")
    shutil.rmtree(tmp)
    mq, _ = load(str(export_dir))
    lq = np.array(mq(mx.array(toks.astype(np.int32))).astype(mx.float32))
    q_argmax = float((lt.argmax(-1) == lq.argmax(-1)).mean())
    size = sum(f.stat().st_size for f in export_dir.iterdir() if f.is_file())
    info = {
        "verify_max_abs_logit_diff_unquantized": diff,
        "verify_max_abs_logit": scale,
        "verify_argmax_agreement_unquantized": same_argmax,
        "verify_argmax_agreement_4bit": q_argmax,
        "checkpoint_bytes": size,
    }
    log(f"[export] 4-bit checkpoint {export_dir}: {size / 1e6:.2f} MB; argmax agreement torch vs 4-bit {q_argmax:.4f}; "
        f"{time.time() - t0:.1f}s")
    (export_dir / "README.md").unlink(missing_ok=True)  # mlx-lm's generic hub card; see reference/README.md
    return info


# --------------------------------------------------------------------------- main
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--minutes", type=float, default=None, help="wall-clock budget of the training loop")
    ap.add_argument("--steps", type=int, default=None, help="max optimizer steps")
    ap.add_argument("--max-wall", type=float, default=None,
                    help="hard limit (s) on the whole process; training stops early enough to save")
    ap.add_argument("--save-reserve", type=float, default=25.0, help="seconds kept for the final eval + saving")
    ap.add_argument("--corpus-dir", default=str(REPO / ".corpus"),
                    help="packed corpus (built here from --stdlib-dir if it has no meta.json)")
    ap.add_argument("--stdlib-dir", default=None)
    ap.add_argument("--out", default=str(REPO / ".work" / "reference_run"), help="training outputs")
    ap.add_argument("--export-dir", default=str(DEFAULT_EXPORT_DIR))
    ap.add_argument("--no-export", action="store_true")
    ap.add_argument("--export-only", default=None, metavar="CKPT_DIR", help="skip training; export CKPT_DIR")
    ap.add_argument("--corpus-only", action="store_true")
    ap.add_argument("--pack-to", default=None, metavar="DIR",
                    help="after training, also write a lossless compressed copy of the weights to DIR (for transfer)")
    ap.add_argument("--unpack", nargs=2, default=None, metavar=("PACKED_DIR", "CKPT_DIR"),
                    help="restore the safetensors shards of a --pack-to directory, then exit")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=None, help="default 64 on cuda, 4 on cpu")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--min-lr", type=float, default=2e-4)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--patience", type=int, default=3, help="dev evals without improvement before the LR decay")
    ap.add_argument("--min-improve", type=float, default=0.002, help="relative dev-loss improvement that counts")
    ap.add_argument("--decay-start", type=float, default=0.8, help="latest start of the LR decay (budget fraction)")
    ap.add_argument("--decay-frac", type=float, default=0.25, help="decay length / progress at its start")
    ap.add_argument("--amp-cpu", action="store_true", help="bf16 autocast on the CPU (tests the GPU code path)")
    ap.add_argument("--grad-clip", type=float, default=1.0)
    ap.add_argument("--log-every", type=int, default=50)
    ap.add_argument("--eval-every-s", type=float, default=60.0)
    ap.add_argument("--eval-every-epochs", type=float, default=0.5, help="dev eval every this many train epochs")
    ap.add_argument("--dev-seqs", type=int, default=128)
    ap.add_argument("--shard-mib", type=float, default=15.5)
    ap.add_argument("--experts-impl", default=None)
    args = ap.parse_args(argv)
    if args.batch_size is None:
        args.batch_size = 64 if args.device == "cuda" else 4

    if args.unpack:
        unpack_transfer(Path(args.unpack[0]), Path(args.unpack[1]))
        return
    corpus_dir = Path(args.corpus_dir)
    if not (corpus_dir / "meta.json").exists():
        build_corpus(Path(args.stdlib_dir) if args.stdlib_dir else default_stdlib_dir(), corpus_dir)
    else:
        log(f"[corpus] reusing {corpus_dir} ({json.loads((corpus_dir / 'meta.json').read_text())['python']} stdlib)")
    if args.corpus_only:
        return
    if args.export_only:
        export(Path(args.export_only), corpus_dir, Path(args.export_dir))
        return
    train(args)
    if args.pack_to:
        pack_for_transfer(Path(args.out), Path(args.pack_to))
        for f in ("metrics.json",):
            shutil.copy(Path(args.out) / f, Path(args.pack_to) / f)
    if args.no_export:
        return
    try:
        import mlx_lm  # noqa: F401
    except ImportError:
        log("[export] mlx-lm not installed here; skipping export (run --export-only on a machine with mlx)")
        return
    export(Path(args.out), corpus_dir, Path(args.export_dir))


if __name__ == "__main__":
    main()
